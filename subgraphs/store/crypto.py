"""Optional encryption of stored resource payloads with a per-facility key (AES-256-GCM).

Contract
--------
* A :class:`Keyring` names keys by key id (``kid``) and says which key each facility encrypts
  with (``"*"``: every facility not named). It is read from a JSON file
  (``UNIHEALTH_PAYLOAD_KEYS``)::

      {"keys": {"fac-001-2026a": "<base64 of 32 random bytes>", "shared-2025": "..."},
       "encrypt": {"fac-001": "fac-001-2026a", "*": "shared-2025"}}

  :func:`load_keyring` refuses a malformed file (:class:`KeyringError`, naming the problem).
* :meth:`Keyring.seal` encrypts the JSON of ``type/id`` for ``facility`` with that facility's
  active key; a facility with no key (and no ``"*"``) keeps plaintext. A sealed payload is
  ``MAGIC | len(kid) | kid | nonce(12) | ciphertext+tag``; the associated data is ``type/id``, so a
  payload copied onto another resource does not open.
* :func:`reveal` returns the plaintext of a stored payload: plaintext JSON (it never starts with
  ``MAGIC``) passes through, so encryption can be switched on for a live store and old rows stay
  readable. Sealed payloads are opened with the key their ``kid`` names, from every keyring
  :func:`register`-ed in this process (``open_database`` registers the one it is given); an
  unknown kid or a payload that fails authentication raises :class:`PayloadKeyError` — never
  garbage.
* Rotation: add a new key, point the facility at it; new versions are sealed with it while the old
  key stays in ``keys`` for the rows it sealed (``unihealth reencrypt`` rewrites a facility's rows
  with its active key, after which the old key can go). See docs/security.md.

What it does not cover: search-index values (they must be comparable in SQL), the audit chain's
copies of AuditEvents and outbox events (which carry no resource body) stay plaintext; encrypted
volumes are the protection for those (docs/security.md).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"\x00UHE1"  # a JSON document never starts with NUL
_NONCE = 12
_KEY_BYTES = 32


class KeyringError(ValueError):
    """The keyring file is unusable (the message says why)."""


class PayloadKeyError(RuntimeError):
    """A stored payload cannot be opened: its key is not configured here, or it was altered."""


@dataclass(frozen=True)
class Keyring:
    keys: dict[str, bytes]
    encrypt: dict[str, str]  # facility (or "*") -> kid
    _ciphers: dict[str, AESGCM] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for kid, key in self.keys.items():
            self._ciphers[kid] = AESGCM(key)

    def kid_for(self, facility: str) -> str | None:
        return self.encrypt.get(facility, self.encrypt.get("*"))

    def seal(self, facility: str, resource_type: str, resource_id: str, plaintext: bytes) -> bytes:
        """``plaintext`` sealed with ``facility``'s active key, or unchanged if it has none."""
        kid = self.kid_for(facility)
        if kid is None:
            return plaintext
        nonce = os.urandom(_NONCE)
        sealed = self._ciphers[kid].encrypt(nonce, plaintext, _aad(resource_type, resource_id))
        encoded = kid.encode()
        return MAGIC + bytes([len(encoded)]) + encoded + nonce + sealed

    def cipher(self, kid: str) -> AESGCM | None:
        return self._ciphers.get(kid)


_REGISTERED: dict[str, AESGCM] = {}


def register(keyring: Keyring) -> None:
    """Make ``keyring``'s keys available to :func:`reveal` in this process (idempotent)."""
    for kid in keyring.keys:
        cipher = keyring.cipher(kid)
        assert cipher is not None
        _REGISTERED[kid] = cipher


def is_sealed(payload: bytes) -> bool:
    return payload.startswith(MAGIC)


def _header(payload: bytes) -> tuple[str, int]:
    """(kid, offset of the nonce) of a sealed payload."""
    start = len(MAGIC) + 1
    end = start + payload[len(MAGIC)]
    return payload[start:end].decode(errors="replace"), end


def kid_of(payload: bytes) -> str | None:
    """The key id of a sealed payload (None for plaintext)."""
    return _header(payload)[0] if is_sealed(payload) else None


def reveal(resource_type: str, resource_id: str, payload: bytes) -> bytes:
    """The plaintext JSON of a stored payload (see the module contract)."""
    if not is_sealed(payload):
        return payload
    kid, at = _header(payload)
    cipher = _REGISTERED.get(kid)
    if cipher is None:
        raise PayloadKeyError(f"{resource_type}/{resource_id} is sealed with key {kid!r}, which is not configured")
    try:
        return cipher.decrypt(payload[at : at + _NONCE], payload[at + _NONCE :], _aad(resource_type, resource_id))
    except InvalidTag:
        raise PayloadKeyError(f"{resource_type}/{resource_id}: the sealed payload failed authentication") from None


def _aad(resource_type: str, resource_id: str) -> bytes:
    return f"{resource_type}/{resource_id}".encode()


def load_keyring(path: str | Path) -> Keyring:
    """The keyring in the JSON file at ``path`` (see the module contract)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise KeyringError(f"cannot read the payload keyring {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise KeyringError(f"the payload keyring {path} is not JSON: {exc}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("keys"), dict)
        or not isinstance(data.get("encrypt"), dict)
    ):
        raise KeyringError(f"the payload keyring {path} needs an object with 'keys' and 'encrypt' objects")
    keys: dict[str, bytes] = {}
    for kid, value in data["keys"].items():
        if not kid or len(kid.encode()) > 255 or not isinstance(value, str):
            raise KeyringError(f"payload key {kid!r}: ids are 1-255 bytes and keys base64 strings")
        try:
            key = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise KeyringError(f"payload key {kid!r} is not base64") from None
        if len(key) != _KEY_BYTES:
            raise KeyringError(f"payload key {kid!r} has {len(key)} bytes; AES-256-GCM needs {_KEY_BYTES}")
        keys[kid] = key
    encrypt: dict[str, str] = {}
    for facility, kid in data["encrypt"].items():
        if not isinstance(kid, str) or kid not in keys:
            raise KeyringError(f"facility {facility!r} encrypts with {kid!r}, which is not in 'keys'")
        encrypt[facility] = kid
    return Keyring(keys, encrypt)


def new_key() -> str:
    """A fresh key for a keyring file (base64 of 32 random bytes)."""
    return base64.b64encode(os.urandom(_KEY_BYTES)).decode()
