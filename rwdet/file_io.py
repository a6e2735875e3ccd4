"""Paths and URIs for model files, through iopath as Detectron2 resolves ``MODEL.WEIGHTS``.

rwdet keeps its own ``PathManager`` (detectron2's registers handlers rwdet does not need and
importing it pulls in detectron2). Registered: local paths, ``file://`` URIs and ``http(s)://``
URLs (downloaded once into iopath's cache, ``$FVCORE_CACHE`` or ``~/.torch/iopath_cache``). A
project that stores weights elsewhere registers its own handler:
``rwdet.file_io.PathManager.register_handler(MyHandler())``, after which every rwdet loader
accepts those URIs.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from iopath.common.file_io import HTTPURLHandler, NativePathHandler, PathHandler
from iopath.common.file_io import PathManager as _PathManager

from rwdet.run.errors import UserError

__all__ = ["PathManager", "local_path"]


class FileURIHandler(PathHandler):
    """``file:///abs/path`` (RFC 8089): the native handler on the decoded path. iopath itself
    has no handler for the scheme, so without this ``file://`` would be read as a relative
    folder named ``file:``. (Delegates rather than subclasses: a ``NativePathHandler``
    subclass would replace iopath's handler for plain paths.)"""

    PREFIX = "file://"
    _native = NativePathHandler()

    def _get_supported_prefixes(self) -> list[str]:
        return [self.PREFIX]

    def _to_native(self, path: str) -> str:
        parsed = urlparse(path)
        if parsed.netloc not in ("", "localhost"):
            raise UserError(
                f"{path!r} names the host {parsed.netloc!r}; a file:// URI must be local "
                "(file:///absolute/path)"
            )
        return unquote(parsed.path)

    def _get_local_path(self, path: str, **kwargs) -> str:
        return self._native._get_local_path(self._to_native(path), **kwargs)

    def _open(self, path: str, mode: str = "r", **kwargs):
        return self._native._open(self._to_native(path), mode, **kwargs)

    def _exists(self, path: str, **kwargs) -> bool:
        return self._native._exists(self._to_native(path), **kwargs)

    def _isfile(self, path: str, **kwargs) -> bool:
        return self._native._isfile(self._to_native(path), **kwargs)


PathManager = _PathManager()
PathManager.register_handler(HTTPURLHandler())
PathManager.register_handler(FileURIHandler())


def local_path(path_or_uri, what: str = "file") -> str:
    """A local file for ``path_or_uri`` (downloaded first for a URL); a ``UserError`` naming
    the URI when it cannot be fetched. Local paths are returned as given, so error messages
    name what the user typed."""
    path = os.fspath(path_or_uri)
    if "://" not in path:
        return path
    if not any(path.startswith(p) for p in PathManager._path_handlers):  # iopath has no public way
        scheme = path.split("://", 1)[0]
        raise UserError(
            f"{what} {path!r}: no handler is registered for {scheme}:// URIs (rwdet registers "
            "file:// and http(s)://); register one with "
            "rwdet.file_io.PathManager.register_handler(...), or pass a local path"
        )
    try:
        return PathManager.get_local_path(path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - network, HTTP and handler errors alike
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(
            f"{what} {path!r} could not be fetched ({type(e).__name__}: {reason}); check the "
            "address and the network, or download it and pass the local path"
        ) from None
