"""Build hook for the optional compiled accelerator; metadata lives in pyproject.toml.

``ntspy._accel`` (AES-SIV, the NTS response backend and batched UDP for
the NTS server path) and
``ntspy._ke`` (the NTS-KE server's connection loop) need a C compiler, the
Python headers and OpenSSL's (Debian: ``gcc``, ``python3-dev``,
``libssl-dev``). Without them the build skips them (``optional=True``) and
ntspy runs on ``cryptography``, pyOpenSSL and asyncio alone, answering
byte for byte the same.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ntspy._accel",
            ["src/ntspy/_accel.c", "src/ntspy/_accel_siv.c", "src/ntspy/_accel_nts.c",
             "src/ntspy/_accel_scan.c", "src/ntspy/_accel_udp.c"],
            depends=["src/ntspy/_accel.h"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            optional=True,
        ),
        # The NTS-KE server's accept/TLS/answer loop (server/ke_server.py).
        Extension(
            "ntspy._ke",
            ["src/ntspy/_ke.c"],
            libraries=["ssl", "crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            optional=True,
        ),
    ]
)
