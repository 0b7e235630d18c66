"""The model libraries' errors (diffusers, timm, safetensors, torch) as :class:`EngineError`.

A library raises ``OSError``, ``ValueError``, ``RuntimeError`` … with long, multi-line
messages; the engine reports one line that names the file or folder and what it could
not do, with the library's error type and the first line of its message.

Example:
    >>> from pathlib import Path
    >>> try:
    ...     with as_engine_error("cannot load the VAE", path=Path("vae")):
    ...         raise OSError("no file named diffusion_pytorch_model.safetensors")
    ... except EngineError as err:
    ...     print(err)
    vae: cannot load the VAE (OSError: no file named diffusion_pytorch_model.safetensors)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histosynth.synthesis.errors import EngineError

__all__ = ["as_engine_error", "short_error"]


def short_error(err: BaseException) -> str:
    """``"<type>: <first line of the message, at most 200 characters>"`` (the type alone
    when the message is empty)."""
    text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextmanager
def as_engine_error(
    what: str,
    *,
    path: Path,
    catch: tuple[type[BaseException], ...] = (Exception,),
) -> Iterator[None]:
    """Inside the block, an exception of a type in ``catch`` becomes the
    :class:`EngineError` ``"<what> (<short_error>)"`` naming ``path``; an
    :class:`EngineError` passes as it is."""
    try:
        yield
    except EngineError:
        raise
    except catch as err:
        raise EngineError(f"{what} ({short_error(err)})", path=path) from err
