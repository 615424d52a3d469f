"""The one privacy label per way of generating, shown by the CLI, the Python API and the app. Qt-free.

Three kinds of label, never anything in between:
- "Private: this device": nothing leaves the machine (generation in process, or the split through a backend on
  loopback, which is this machine too);
- "Private: attested confidential server (...)": the server proved what it runs, and what was verified is named;
- "Not private: ...": every other server, with the measured leakage of the chosen split and encryption
  (desktop/core/leakage.py, measured by bench/leakage.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hediff.desktop.core import leakage


class Where(StrEnum):
    DEVICE = "device"  # the whole pipeline in this process
    LOOPBACK = "loopback"  # the paper's split through a backend this process started on 127.0.0.1
    SERVER = "server"  # the paper's split through a server that proved nothing
    CONFIDENTIAL = "confidential"  # an attested confidential server runs the whole pipeline


PRIVATE_DEVICE = "Private: this device (nothing leaves this machine)"


@dataclass(frozen=True)
class PrivacyLabel:
    private: bool
    text: str


def label_for(where: Where, split: str = "", encryption: str = "", verified: str = "") -> PrivacyLabel:
    """The label of one way of generating. ``verified``: for a confidential server, what its attestation proved."""
    if where is Where.DEVICE:
        return PrivacyLabel(True, PRIVATE_DEVICE)
    if where is Where.LOOPBACK:
        return PrivacyLabel(True, f"{PRIVATE_DEVICE}; the split runs through a backend on loopback")
    if where is Where.CONFIDENTIAL:
        if not verified:
            raise ValueError("a confidential server is only labelled private with what its attestation verified")
        return PrivacyLabel(True, f"Private: attested confidential server ({verified})")
    text = leakage.privacy_label(split, encryption)
    if not text.startswith("Not private"):  # e.g. "leaks little beyond the prompt": the prompt alone is not private
        text = f"Not private: this server sees what the split sends; {text}"
    return PrivacyLabel(False, text)


def init_image_note(private: bool, split: str) -> str:
    """What happens to an img2img picture in this mode, said beside the label (the app's line and Privacy tab)."""
    if private:
        return "The init image is read and encoded on this machine and never leaves it."
    from hediff.common.settings import U_SPLITS

    sent = "the U-shaped head's activations" if split in U_SPLITS else f"the activations at {split}"
    return (
        "The init image is read and encoded on this machine; the server gets what the split sends of its noised "
        f"latent ({sent}, as for text to image), enough to rebuild the picture as measured."
    )
