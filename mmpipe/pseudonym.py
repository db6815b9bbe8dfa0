"""Pseudonymisation: identifiers leave ingest only as salted, keyed hashes.

HMAC-SHA256 with a secret salt (config, never code) means the same patient always maps to the
same key inside one hospital (so splits stay patient-level) while the key cannot be reversed or
recomputed by anyone without the salt.
"""

from __future__ import annotations

import hashlib
import hmac

KEY_CHARS = 24


def pseudonym(salt: bytes, kind: str, value: str) -> str:
    """Stable pseudonymous key for one identifier of one kind ("patient", "study", ...)."""
    digest = hmac.new(salt, f"{kind}\x00{value.strip()}".encode(), hashlib.sha256).hexdigest()
    return f"{kind[0]}{digest[:KEY_CHARS]}"


def fallback_patient(source_key: str, member: str = "") -> str:
    """Identity for images without a PatientID (PNG/JPEG): the folder that holds them, inside its
    archive when the image is an archive member.

    Exports put one patient per folder (``training/<class>/<patient>/img.png``); treating the
    folder as the patient keeps all of its images on one side of every split.
    """
    if member:
        folder = member.rsplit("/", 1)[0] if "/" in member else ""
        return f"archive:{source_key}!{folder}"
    parent = source_key.rsplit("/", 1)[0] if "/" in source_key else source_key
    return "folder:" + parent


PLACEHOLDERS = ("CHANGE_ME", "changeme")
MIN_SALT_CHARS = 16


def salt_fingerprint(salt: bytes) -> str:
    """What the catalog records about the salt: a keyed hash of a fixed text (the salt stays secret)."""
    return pseudonym(salt, "salt", "mmpipe salt fingerprint")


def salt_problem(salt: bytes) -> str | None:
    """Why ``salt`` must not pseudonymise patients (a template placeholder, too short), or None."""
    text = salt.decode(errors="replace")
    if any(p in text for p in PLACEHOLDERS):
        return "is still the template's placeholder"
    if len(text) < MIN_SALT_CHARS:
        return f"is shorter than {MIN_SALT_CHARS} characters"
    return None


def salt_change(active: str | None, salt: bytes) -> str:
    """Compare ``salt`` with the catalog's active fingerprint: 'new', 'same' or 'changed'."""
    if active is None:
        return "new"
    return "same" if hmac.compare_digest(active, salt_fingerprint(salt)) else "changed"
