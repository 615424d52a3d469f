"""Attestation evidence of a confidential backend: report parsing, AMD's pinned roots, the nonce/TLS-key binding,
policy and verification. No Qt, no web framework."""
