"""How ``compare`` reuses its activation caches: resume, never wipe.

``DIR/cache/<model>_<eval|probe>.h5`` is reused when it matches the request (complete: a cache
hit; interrupted: resumed where it stopped). Only a *settings mismatch*
(:class:`~interptool.cache.CacheMismatchError`: another model, data set, layer list, dtype...)
leads to recomputation, and then

* without ``--overwrite``: into a new file beside it (``<stem>.2.h5``, ``<stem>.3.h5``, ...;
  the first that matches or does not exist yet), so the old file is kept and a later run with
  the old settings finds it again;
* with the user's explicit ``--overwrite``: in place.

Every other cache fault (a forward failure, a lock held by another process, a full disk,
non-finite activations, a file that is not a cache) stops the run with its own one-line error
(exit 2 in the CLI) and leaves the partial cache as it is, so re-running the same command
resumes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from interptool._progress import say

__all__ = ["MAX_VARIANTS", "cache_or_resume", "variant_path"]

#: how many alternative files a mismatching cache may spawn before the run asks for a decision
MAX_VARIANTS = 20


def variant_path(path: Path, k: int) -> Path:
    """``path`` itself for ``k <= 1``, else ``<stem>.<k><suffix>`` beside it."""
    path = Path(path)
    return path if k <= 1 else path.with_name(f"{path.stem}.{k}{path.suffix}")


def cache_or_resume(loaded: Any, dataset: Any, layers: list[str], path: Path, *,
                    overwrite: bool = False, **kw: Any) -> Path:
    """``cache_activations`` under compare's policy (module docstring); returns the file used.

    ``overwrite``: the user's ``--overwrite``: a mismatching cache at ``path`` is replaced.
    Any :class:`~interptool.errors.CacheError` other than a mismatch propagates unchanged.
    """
    from interptool.cache import CacheMismatchError, cache_activations
    from interptool.errors import CacheError

    if overwrite:
        return Path(cache_activations(loaded, dataset, layers, path, overwrite=True, **kw))
    first: CacheMismatchError | None = None
    for k in range(1, MAX_VARIANTS + 1):
        p = variant_path(path, k)
        try:
            got = Path(cache_activations(loaded, dataset, layers, p, overwrite=False, **kw))
        except CacheMismatchError as exc:
            first = first or exc
            continue
        if k > 1:
            fields = ", ".join(first.fields) if first is not None and first.fields else "settings"
            say(f"{path.name} was made with other {fields}; kept it and used {p.name} "
                "(--overwrite replaces it instead)")
        return got
    raise CacheError(
        f"{path}: this cache and {MAX_VARIANTS - 1} alternatives beside it were all made with "
        f"other settings ({first}); delete the ones you no longer need, choose another --out, "
        "or re-run with --overwrite to replace it")
