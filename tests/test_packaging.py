"""setup.py declares compatible ranges (a service keeps its own torch); constraints.txt pins the exact
versions the tests run with, and every pin must lie inside its range."""
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins(text: str) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return {canonicalize_name(name): version for name, version in (line.split("==") for line in lines if line)}


def problems(requirements: list[str], pinned: dict[str, str]) -> list[str]:
    """What is wrong with ``requirements`` against the ``pinned`` versions."""
    out = []
    for req in map(Requirement, requirements):
        if any(spec.operator == "==" for spec in req.specifier):
            out.append(f"{req} pins an exact version")
        if not any(spec.operator == "<" for spec in req.specifier):
            out.append(f"{req} has no upper bound")
        pin = pinned.get(canonicalize_name(req.name))
        if pin is None:
            if 'extra == "tensorrt"' not in str(req.marker):  # full TensorRT installs from NVIDIA's host only
                out.append(f"{req} is not pinned in constraints.txt")
        elif not req.specifier.contains(pin):
            out.append(f"constraints.txt pins {req.name}=={pin}, outside {req.specifier}")
    return out


def test_requirements_are_ranges_and_every_pin_fits_its_range():
    requirements = requires("onex-export")
    assert len(requirements) > 10
    assert problems(requirements, pins((ROOT / "constraints.txt").read_text())) == []


def test_exact_pins_missing_pins_and_pins_outside_a_range_are_caught():
    found = problems(["torch>=2.13,<3", "numpy==2.4.6", "onnx>=1.23", "click>=8.5,<9"],
                     {"torch": "3.0.0", "numpy": "2.4.6", "onnx": "1.23.2"})
    assert found == ["constraints.txt pins torch==3.0.0, outside <3,>=2.13", "numpy==2.4.6 pins an exact version",
                     "numpy==2.4.6 has no upper bound", "onnx>=1.23 has no upper bound", "click<9,>=8.5 is not pinned in constraints.txt"]
