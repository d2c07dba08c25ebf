"""Signed weight versions: OpenSSF model-signing (its private-key method, offline: no Sigstore,
no network) over a version's directory, i.e. its weights and `graphs.json`, which names the
export's graph files by sha256. A version signed with the trusted key therefore ties those
weights to those graphs; hashes alone cannot (a directory replaced whole with a re-hashed
manifest is self-consistent).

Keys are elliptic-curve PEM files (NIST P-256/384/521), e.g.
`openssl ecparam -name prime256v1 -genkey -noout -out key.pem` and
`openssl ec -in key.pem -pubout -out key.pub`.
"""

from pathlib import Path
from typing import Any

from export.errors import ExportError, IntegrityError, first_line
from export.store.versions import SIGNATURE


def _model_signing() -> Any:
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as exc:
        raise ExportError(f"signing needs OpenSSF model-signing ({exc.msg}): pip install "
                          "'returnt-zoo[sign]' (make install installs it)") from None
    return model_signing


def _hashing(ms: Any, directory: Path) -> Any:
    """Every file of the version directory except its signature."""
    return ms.hashing.Config().set_ignored_paths(paths=[str(directory / SIGNATURE)], ignore_git_paths=False)


def _key_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{what} {path}: no such file")
    return path


def sign_version(directory: Path, private_key: Path) -> Path:
    """Write `directory/model.sig`: a model-signing bundle over every other file there."""
    ms = _model_signing()
    directory = Path(directory)
    try:
        (ms.signing.Config().use_elliptic_key_signer(private_key=_key_file(private_key, "--sign-key"))
         .set_hashing_config(_hashing(ms, directory)).sign(directory, directory / SIGNATURE))
    except (ValueError, TypeError) as exc:
        raise ExportError(f"--sign-key {private_key}: cannot sign with it ({first_line(exc, 160)}); "
                          "expected an elliptic-curve private key in PEM (openssl ecparam -name prime256v1 "
                          "-genkey -noout -out key.pem)") from None
    return directory / SIGNATURE


def check_signature(directory: Path, public_key: Path, what: str = "version") -> None:
    """The version directory is signed by the private key of `public_key` and unchanged since;
    one-line IntegrityError otherwise."""
    ms = _model_signing()
    directory = Path(directory)
    key = _key_file(public_key, "--trust-key")
    if not (directory / SIGNATURE).is_file():
        raise IntegrityError(f"{what} is not signed ({directory / SIGNATURE} missing); the trusted key "
                             f"{key.name} accepts only versions published with --sign-key")
    try:
        (ms.verifying.Config().use_elliptic_key_verifier(public_key=key)
         .set_hashing_config(_hashing(ms, directory)).verify(directory, directory / SIGNATURE))
    except Exception as exc:  # model-signing raises ValueError and cryptography's InvalidSignature alike
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise IntegrityError(f"{what}: signature does not verify with {key.name} ({message})") from None
