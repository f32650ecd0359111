"""Build hook for the optional compiled accelerator; metadata lives in pyproject.toml.

``ntspy._accel`` (AES-SIV for the NTS server path) needs a C compiler, the
Python headers and OpenSSL's (Debian: ``gcc``, ``python3-dev``,
``libssl-dev``). Without them the build skips it (``optional=True``) and
ntspy runs on ``cryptography`` alone, answering byte for byte the same.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ntspy._accel",
            ["src/ntspy/_accel.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
