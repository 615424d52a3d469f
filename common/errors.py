"""The one error hierarchy: every error whose message is written for the user derives from HEDiffusionError.

The CLI prints such a message as one line and exits with the class's ``exit_code``; the app shows it as is.
Anything else is a bug and is reported generically (its text could hold anything, so it is not shown).
Exit codes (docs/protocol.md lists them too):

    0   done
    1   unexpected error (a bug: see the log)
    2   usage: a bad option or setting, found before anything ran
    3   the server refused the request (it answered with an error)
    4   the server could not be reached (connection, timeout, TLS)
    5   the model is missing or not usable
    6   keys: no keyring, a wrong passphrase, a damaged key file
    7   the other side broke the protocol (an answer that cannot be used)
    8   attestation: the server's evidence did not verify (nothing was sent)
    130 cancelled (Ctrl-C or the cancel button)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_SERVER_REFUSED = 3
EXIT_UNREACHABLE = 4
EXIT_MODEL = 5
EXIT_KEYS = 6
EXIT_PROTOCOL = 7
EXIT_ATTESTATION = 8
EXIT_CANCELLED = 130


class HEDiffusionError(Exception):
    """An error whose message is written for the user: what was wrong and what to do."""

    exit_code: int = EXIT_UNEXPECTED


class UsageError(HEDiffusionError, ValueError):
    """A bad option, setting or argument, found before anything ran."""

    exit_code = EXIT_USAGE


class ModelError(HEDiffusionError):
    """The model (or a file shipped with it) is missing or not usable."""

    exit_code = EXIT_MODEL


class KeysError(HEDiffusionError):
    """The keyring, a device key or its protection."""

    exit_code = EXIT_KEYS


class CryptoError(HEDiffusionError):
    """CKKS parameters, contexts or ciphertexts that cannot be used."""

    exit_code = EXIT_PROTOCOL


class Cancelled(HEDiffusionError):
    """The user stopped the job."""

    exit_code = EXIT_CANCELLED
