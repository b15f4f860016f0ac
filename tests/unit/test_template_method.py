"""``sdze_lightning.template_method.allow_public_override`` on a toy template-method base.

The base does a shared opening in its public ``run`` and hands over to the abstract hook
``_hook``, and calls :func:`allow_public_override` from ``__init_subclass__`` (as
``Estimator`` and ``ZerothOrderOptimizer`` do). Checked: a subclass overriding only ``run``
can be built and its ``_hook`` raises ``NotImplementedError`` naming both; every other
subclass keeps the abstract hook (or its own).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import pytest

from sdze_lightning.template_method import allow_public_override


class Base(ABC):
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        allow_public_override(cls, "run", "_hook")

    def run(self, x: int) -> int:
        return self._hook(x + 1)  # the shared opening, then the hook

    @abstractmethod
    def _hook(self, x: int) -> int: ...


def test_a_subclass_with_neither_stays_abstract():
    class Nothing(Base):
        pass

    with pytest.raises(TypeError, match="_hook"):
        Nothing()
    assert "_hook" in Nothing.__abstractmethods__
    assert "_hook" not in vars(Nothing)


def test_a_subclass_implementing_the_hook_keeps_it():
    class Hooked(Base):
        def _hook(self, x: int) -> int:
            return 10 * x

    assert Hooked().run(1) == 20
    assert Hooked.__abstractmethods__ == frozenset()


def test_a_subclass_overriding_the_public_method_can_be_built():
    class Public(Base):
        def run(self, x: int) -> int:
            return -x

    assert Public.__abstractmethods__ == frozenset()
    obj = Public()
    assert obj.run(3) == -3
    with pytest.raises(NotImplementedError) as info:
        obj._hook(3)
    assert str(info.value) == "Public overrides run() and has no _hook()."
    assert Public._hook.__name__ == "_hook"
    assert "_hook" in vars(Public)  # set on the subclass, not on the base
    assert getattr(Base._hook, "__isabstractmethod__", False)


def test_the_public_method_calling_the_base_reaches_the_unimplemented_hook():
    class Wrapper(Base):
        def run(self, x: int) -> int:
            return super().run(x)

    with pytest.raises(NotImplementedError, match=r"Wrapper overrides run\(\) and has no _hook"):
        Wrapper().run(0)


def test_a_subclass_that_defines_both_keeps_its_hook():
    class Both(Base):
        def run(self, x: int) -> int:
            return self._hook(x)

        def _hook(self, x: int) -> int:
            return x * x

    assert Both().run(4) == 16


def test_subclasses_of_a_public_override_inherit_or_replace_the_stand_in():
    class Public(Base):
        def run(self, x: int) -> int:
            return x

    class Child(Public):  # inherits both: buildable, the stand-in names Child
        pass

    with pytest.raises(NotImplementedError, match="^Child overrides run"):
        Child()._hook(0)
    assert "_hook" not in vars(Child)

    class Grandchild(Public):
        def _hook(self, x: int) -> int:
            return 7

        def run(self, x: int) -> int:  # the inherited hook is no longer abstract: kept
            return self._hook(x)

    assert Grandchild().run(0) == 7


def test_other_abstract_methods_are_still_enforced():
    class Wider(Base):
        @abstractmethod
        def other(self) -> None: ...

    class PublicOnly(Wider):
        def run(self, x: int) -> int:
            return x

    with pytest.raises(TypeError, match="other"):
        PublicOnly()
    assert PublicOnly.__abstractmethods__ == frozenset({"other"})
