"""The warm runner finishes pydantic models before forking, so runs do not each build them."""

from __future__ import annotations

import sys
import types

import pytest

from flows.warm_runner import complete_models

SOURCE = '''
from __future__ import annotations
from pydantic import BaseModel

class Run(BaseModel):          # refers to a class defined below: left incomplete
    state: State | None = None

class State(BaseModel):
    name: str = "Pending"

class Orphan(BaseModel):       # refers to a name that never exists
    other: Missing | None = None
'''


@pytest.fixture
def package() -> types.ModuleType:
    name = "cf_models_pkg.schemas"
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(SOURCE, name, "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules[name]


def test_models_left_to_first_use_are_finished(package: types.ModuleType) -> None:
    assert not package.Run.__pydantic_complete__
    assert complete_models("cf_models_pkg") == 1
    assert package.Run.__pydantic_complete__
    assert package.Run(state={"name": "Running"}).state.name == "Running"
    assert not package.Orphan.__pydantic_complete__  # left for pydantic, no error
    assert complete_models("cf_models_pkg") == 0  # nothing left to do
