"""A server TLS context that follows its certificate files (cert-manager rotation).

The kubelet updates a mounted Secret by swapping a `..data` symlink, so a rotated certificate
shows as files with a new inode and mtime. At every TLS handshake (a new connection, never per
request) the SNI callback stats the two files — two syscalls, a few microseconds — and when
they changed loads them into a fresh `SSLContext` that this and later handshakes use.
Connections already open keep the certificate they were made with.

A pair that does not load (a key that no longer matches its certificate while the two files are
rewritten one after the other, a file missing for a moment) keeps the previous certificate in
service; the next handshake after the files change again tries once more.
"""

from __future__ import annotations

import logging
import os
import ssl

log = logging.getLogger("ringside.inject")

Signature = tuple[tuple[int, int, int, int], ...]


class ReloadingTLS:
    """`context` is the listening context; the certificate it serves is re-read when the
    files change. Raises OSError or ssl.SSLError at construction if the files do not load."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self._signature = self._stat()
        self._refused: Signature | None = None
        self.current = self._load()
        self.context = self.current
        self.context.sni_callback = self._pick

    def refresh(self) -> bool:
        """Load the files if they changed since the last load; True when a new pair is in use."""
        signature = self._stat()
        if signature is None or signature in (self._signature, self._refused):
            return False
        try:
            fresh = self._load()
        except (OSError, ssl.SSLError) as exc:
            self._refused = signature
            log.warning("new TLS files not loaded, the previous certificate stays: %s", exc)
            return False
        self.current, self._signature, self._refused = fresh, signature, None
        log.info("TLS certificate reloaded from %s", self.cert_path)
        return True

    def _pick(self, ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        try:
            self.refresh()
        except Exception:  # never fail a handshake over the reload: serve what we have
            log.exception("TLS certificate reload failed")
        if ssl_object.context is not self.current:
            ssl_object.context = self.current

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def _stat(self) -> Signature | None:
        """Identity of the two files' current contents, following symlinks; None if one is
        missing (mid-swap)."""
        try:
            stats = [os.stat(path) for path in (self.cert_path, self.key_path)]
        except OSError:
            return None
        return tuple((s.st_dev, s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)
