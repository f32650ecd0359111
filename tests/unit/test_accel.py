"""The optional compiled module (``ntspy._accel``): built where it can be,
switched off by NTSPY_NO_ACCEL, and safe against hostile input (Python
exceptions, never a crash; it still works afterwards).

That it makes the same bytes as the pure-Python code is tests/unit/test_backends.py's.
Where it is not built (no compiler or OpenSSL headers at install time), the
first test checks that this can only happen where the headers are missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from ntspy.errors import AuthenticationFailure
from ntspy.proto import nts
from ntspy.proto.aead import ACCELERATED, Aead, AeadId
from ntspy.proto.cookies import CookieKeys, KeyRing, MasterKey
from ntspy.proto.ntp import NtpHeader
from tests.unit.test_backends import _accelerated_aead, accel


def _headers_present() -> bool:
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return (python_h.exists() and Path("/usr/include/openssl/evp.h").exists()
            and shutil.which("cc") is not None)


def test_accelerator_is_built_where_it_can_be() -> None:
    # test.sh installs gcc, python3-dev and libssl-dev: there the build must
    # not have been skipped silently.
    if _headers_present():
        assert accel is not None, "ntspy._accel was not built although the headers are there"
    if os.environ.get("NTSPY_NO_ACCEL", "") in ("", "0"):
        assert (accel is not None) == ACCELERATED
        assert Aead(AeadId.AES_SIV_CMAC_256, bytes(32)).accelerated == ACCELERATED
    else:
        assert not ACCELERATED
    # GCM-SIV always stays on cryptography
    assert not Aead(AeadId.AES_128_GCM_SIV, bytes(16)).accelerated


def test_ke_engine_is_built_where_it_can_be() -> None:
    # Same for the NTS-KE engine: libssl comes with the same libssl-dev.
    from ntspy.net.tls.credentials import HAVE_NATIVE_KE

    built = importlib.util.find_spec("ntspy._ke") is not None
    if _headers_present() and Path("/usr/include/openssl/ssl.h").exists():
        assert built, "ntspy._ke was not built although the headers are there"
    wanted = built and os.environ.get("NTSPY_NO_ACCEL", "") in ("", "0")
    assert wanted == HAVE_NATIVE_KE


def test_env_var_forces_the_pure_python_path() -> None:
    code = ("from ntspy.proto.aead import ACCELERATED, Aead; "
            "print(ACCELERATED, Aead(17, bytes(64)).accelerated)")
    env = {**os.environ, "NTSPY_NO_ACCEL": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    env["NTSPY_NO_ACCEL"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(accel is not None)] * 2


@pytest.mark.parametrize("length", [0, 1, 15, 16])
def test_short_ciphertexts_are_rejected(length: int) -> None:
    a = _accelerated_aead(AeadId.AES_SIV_CMAC_256, bytes(32))
    expected = a.seal(b"", b"", b"")
    ct = expected[:length] if length < 16 else bytes(16)
    with pytest.raises(AuthenticationFailure):
        a.open(b"", ct, b"")


def test_hostile_arguments_raise_python_exceptions() -> None:
    if accel is None:
        assert not ACCELERATED
        return
    for bad_key in (b"", bytes(16), bytes(31), bytes(33), bytes(128)):
        with pytest.raises(ValueError):
            accel.AesSiv(bad_key)
    with pytest.raises(TypeError):
        accel.AesSiv("not bytes")
    siv = accel.AesSiv(bytes(32))
    with pytest.raises(TypeError):
        siv.seal(b"", b"")
    with pytest.raises(TypeError):
        siv.seal(b"", "text", b"")
    with pytest.raises(TypeError):
        siv.open(None, b"x" * 16, b"")
    with pytest.raises(ValueError):
        siv.encrypt(b"", [b""] * 127)
    with pytest.raises(TypeError):
        siv.encrypt(b"", [b"", 5])
    with pytest.raises(TypeError):
        siv.encrypt(b"", 5)
    assert siv.encrypt(b"x", [b""] * 126) == AESSIV(bytes(32)).encrypt(b"x", [b""] * 126)
    assert siv.key_length == 32
    # still usable after all those errors
    assert siv.seal(b"n", b"p", b"a") == AESSIV(bytes(32)).encrypt(b"p", [b"a", b"n"])


def _plan_and_request() -> tuple[nts.ResponsePlan, bytes, nts.RequestLayout]:
    keys = CookieKeys(AeadId.AES_SIV_CMAC_256, bytes(range(32)), bytes(range(32, 64)))
    ring = KeyRing([MasterKey(1, bytes(32), 0)])
    request = nts.build_request(NtpHeader(transmit_ts=7), b"u" * 32, ring.seal(keys, bytes(16)),
                                0, Aead(AeadId.AES_SIV_CMAC_256, keys.c2s), bytes(16))
    plan = nts.ResponsePlan(Aead(keys.aead_id, keys.c2s), Aead(keys.aead_id, keys.s2c),
                            ring.sealer(keys))
    layout = nts.scan_request(request)
    assert layout is not None
    return plan, request, layout


def test_the_compiled_plan_refuses_what_does_not_fit() -> None:
    plan, request, layout = _plan_and_request()
    assert plan.compiled == (accel is not None and ACCELERATED)
    head, rnd = bytes(48), bytes(32)
    reply = plan.answer(request, layout, head, 1, rnd)
    assert reply is not None and len(reply) == len(request)
    # A request that does not verify gets None (the responder answers it with a NAK),
    # on either backend.
    tampered = request[:-1] + bytes([request[-1] ^ 1])
    assert plan.answer(tampered, layout, head, 1, rnd) is None
    if not plan.compiled:  # not built, or NTSPY_NO_ACCEL: nothing compiled to attack
        assert not nts.COMPILED_BUILDER
        return
    native = plan._native
    assert native is not None and accel is not None
    uid_end, _, nonce_start, nonce_end, ct_start, ct_end = layout[3:]
    offsets = list(layout[3:])
    # a ciphertext shorter than a SIV cannot verify: None
    assert native.answer(request, head, 1, rnd, *offsets[:5], ct_start + 8) is None
    n = len(request)
    bad_answers: list[tuple[type[Exception], tuple[object, ...]]] = [
        (TypeError, (request, head, 1, rnd, *offsets[:5])),
        (TypeError, (request.decode("latin-1"), head, 1, rnd, *offsets)),
        (ValueError, (request, head[:47], 1, rnd, *offsets)),
        (ValueError, (request, head, 1, rnd, *offsets[:5], n + 1)),
        (ValueError, (request, head, 1, rnd, *offsets[:4], ct_end, ct_start)),
        (ValueError, (request, head, 1, rnd, 20, *offsets[1:])),  # unique id inside the header
        (ValueError, (request, head, 1, rnd, *offsets[:2], nonce_end, nonce_start,
                      ct_start, ct_end)),
        (ValueError, (request, head, 1, rnd[:31], *offsets)),
        (ValueError, (request, head, 9, bytes(9 * 16 + 16), *offsets)),
        (ValueError, (request, head, -1, rnd, *offsets)),
        # two cookies do not fit in a request that carries one and no placeholder:
        # the answer would be longer than the question
        (ValueError, (request, head, 2, bytes(48), *offsets)),
        (TypeError, (request, head, "1", rnd, *offsets)),
    ]
    for error, args in bad_answers:
        with pytest.raises(error):
            native.answer(*args)
    with pytest.raises(ValueError):
        native.seal(head, request[48:uid_end], 1, rnd, 10)
    with pytest.raises(TypeError):
        native.seal(head, bytearray(36), 1, rnd, 1000)
    siv = accel.AesSiv(bytes(32))
    good = (siv, siv, siv, b"\x02\x04\x00\x6c", b"\x00\x00\x00\x01", bytes(68), 0, 16, 0,
            (bytes(8),) * 9, (0,) * 9)
    accel.NtsPlan(*good)
    bad_plans: list[tuple[type[Exception], tuple[object, ...]]] = [
        (TypeError, (b"k", *good[1:])),
        (TypeError, (*good[:3], "head", *good[4:])),
        (ValueError, (*good[:3], bytes(17), *good[4:])),
        (ValueError, (*good[:7], 0, *good[8:])),  # no nonce
        (ValueError, (*good[:6], -1, *good[7:])),
        (TypeError, (*good[:9], [bytes(8)] * 9, good[10])),
        (TypeError, (*good[:9], (bytes(8),) * 8, good[10])),
        (ValueError, (*good[:9], (bytes(7),) * 9, good[10])),
        (ValueError, (*good[:10], (-1,) * 9)),
    ]
    for error, args in bad_plans:
        with pytest.raises(error):
            accel.NtsPlan(*args)
    assert plan.answer(request, layout, head, 1, rnd) == reply  # still works
