"""The calls of the so_optax factories that would read as a complete optimizer, made errors.

``so_optax.soap`` and ``so_optax.sophia`` return an update *direction*; the learning rate comes from the
chain, ``optax.chain(so_optax.soap(...), optax.scale(-lr))``. optax's own optimizers take the learning rate
first (``optax.adamw(1e-3)``, ``learning_rate=``), and torch's as ``lr=``. Without these guards such a call
would silently mean something else (``soap(1e-3)`` set ``betas``), or, with the direction used alone as the
optimizer, step uphill with step size 1. :func:`keyword_only` turns those calls into a ``TypeError`` that
shows the chain.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TypeVar

_F = TypeVar("_F", bound=Callable)

#: Keywords that name a learning rate in optax (``learning_rate``) or torch (``lr``).
LEARNING_RATE_KEYWORDS = ("learning_rate", "lr")


def chain_help(name: str) -> str:
    """How a direction factory ``so_optax.<name>`` is combined with a learning rate."""
    return (
        f"so_optax.{name} returns an update direction, not a complete optimizer: the learning rate goes in the "
        f"chain,\n\n    optax.chain(so_optax.{name}(...), optax.scale(-lr))\n\nor "
        f"optax.chain(so_optax.{name}(...), optax.scale_by_learning_rate(schedule)) for a schedule."
    )


def keyword_only(name: str, notes: Mapping[str, str] | None = None) -> Callable[[_F], _F]:
    """Makes the factory ``so_optax.<name>`` (whose options are keyword-only) reject, with :func:`chain_help`:

    * positional arguments (``soap(1e-3)``, the ``optax.adamw(lr)`` habit), and
    * the keywords ``learning_rate=`` / ``lr=``; ``notes`` adds a sentence for some of them (e.g. the
      option that serves a related purpose).

    The wrapper keeps the factory's signature (``inspect.signature`` follows ``__wrapped__``), so
    ``optax.inject_hyperparams`` binds and injects the options as before.
    """
    notes = dict(notes or {})

    def decorate(factory: _F) -> _F:
        @functools.wraps(factory)
        def guarded(*args, **kwargs):
            if args:
                shown = ", ".join(repr(a) for a in args)
                plural = "s" if len(args) > 1 else ""
                raise TypeError(
                    f"so_optax.{name} takes keyword arguments only; got {len(args)} positional argument{plural} "
                    f"({shown}). {chain_help(name)}"
                )
            for key in LEARNING_RATE_KEYWORDS:
                if key in kwargs:
                    note = f" {notes[key]}" if key in notes else ""
                    raise TypeError(f"so_optax.{name} has no {key!r} option. {chain_help(name)}{note}")
            return factory(**kwargs)

        return guarded  # type: ignore[return-value]

    return decorate
