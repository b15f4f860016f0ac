"""Template methods whose subclasses may override the public method instead of the hook.

The estimators' ``estimate`` and the zeroth-order methods' ``step`` do a shared opening
and hand over to an abstract hook (``_estimate``, ``zo_step``). A subclass written against
the public method alone (one that overrides ``estimate`` or ``step`` itself) never calls
the hook, and must still be buildable: :func:`allow_public_override` releases the hook
for it.
"""

from __future__ import annotations

from typing import Any


def allow_public_override(cls: type, public: str, hook: str) -> None:
    """Let ``cls`` override ``public`` itself instead of implementing the abstract ``hook``.

    Call it from the base class's ``__init_subclass__`` (before ``ABCMeta`` collects the
    abstract methods). Where ``cls`` defines ``public`` and ``hook`` is still abstract,
    ``hook`` becomes a method that raises ``NotImplementedError`` naming both, so the
    class can be built; every other class keeps the abstract hook.
    """
    if public not in vars(cls) or not getattr(getattr(cls, hook), "__isabstractmethod__", False):
        return

    def unimplemented(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} overrides {public}() and has no {hook}()."
        )

    unimplemented.__name__ = unimplemented.__qualname__ = hook
    setattr(cls, hook, unimplemented)
