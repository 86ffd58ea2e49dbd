"""What every contract base class shares (light: no torch), and the completeness guard's helper."""

from __future__ import annotations

from typing import Any, ClassVar


class Contract:
    """A contract base: a subclass names the registered entry it tests in the attribute ``names``
    (``preset``, ``kind``, ``backend``, ...), or its class statement fails saying what to set."""

    names: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if Contract not in cls.__bases__ and not getattr(cls, cls.names, ""):
            raise TypeError(f"{cls.__name__}: set {cls.names} = '<name>' (the registered name it tests)")


def missing_hook(test: object, hook: str, what: str) -> NotImplementedError:
    """The error of a contract subclass that lacks ``hook``."""
    return NotImplementedError(f"{type(test).__name__} must define {hook}: {what}")


def contract_subclasses(base: type) -> list[type]:
    found, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found
