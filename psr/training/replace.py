"""`model.replace`: sections of a scan's lattice tracked by neural elements (e.g. a trained surrogate of
their space charge) instead of their physics.

Each entry {elements: [Q1, D1], element: {type: SectionMap, name: SC, inputs: [Q1.k1], weights: ...}}
replaces the consecutive elements named (in lattice order) by the neural element, whose `section` is
those elements' entries (its weights file must have been trained for exactly them). Scan settings of the
replaced elements go to the element's settings ("Q1.k1" -> "SC.Q1_k1"). Weights paths are relative to
the working folder, as other paths of a config.

An entry may add `correct: {every: k, space_charge: {grid_shape, max_step, extent, compensate}}` (a SectionMap of a
charged bunch): the section is then a `models.corrected.CorrectedSection`, the surrogate shifted particle by
particle onto the section's own PIC tracking, taken on the beam of every k-th training step; a fit then lands
where PIC fits the images at about the surrogate's cost per step.
"""

import math
from pathlib import Path

import sim
from models.elements import NEURAL_ELEMENT_TYPES, read_spec, section_setting_key


def replace_sections(items: list[dict], replace: list[dict] | None, setting_names,
                     charge: float | None = None) -> tuple[list[dict], dict]:
    """(lattice entries with the sections replaced, {scan setting: the neural element's setting}). charge: the
    scan's bunch charge [C]; a SectionMap with space charge of another charge is an error."""
    routes = {}
    for index, entry in enumerate(replace or []):
        where = f"model.replace[{index}]"
        if not isinstance(entry, dict) or not {"elements", "element"} <= set(entry) <= {"elements", "element", "correct"}:
            raise ValueError(f"{where} must be {{elements: [<names>], element: {{type: ..., name: ..., weights: ...}}, "
                             f"correct: (optional) {{every: <steps>, space_charge: {{...}}}}}}, got {entry!r}")
        names, element = list(entry["elements"] or []), dict(entry["element"] or {})
        present = [item.get("name") for item in items]
        missing = [n for n in names if n not in present]
        if not names or missing:
            raise ValueError(f"{where}: elements {missing or names} not in the lattice; elements: {present}")
        first = present.index(names[0])
        if present[first:first + len(names)] != names:
            raise ValueError(f"{where}: elements {names} must be consecutive and in lattice order; the lattice: {present}")
        if element.get("weights") is not None:  # what the weights were trained as fills what the entry leaves out
            kind, spec = read_spec(element["weights"])
            element.setdefault("type", kind)
            if element["type"] == kind:
                for key, value in spec.items():
                    if key != "section":  # the section is the lattice's own (a mismatch: "trained for another")
                        element.setdefault(key, value)
        if element.get("type") not in NEURAL_ELEMENT_TYPES:
            raise ValueError(f"{where}.element: type must be one of {sorted(NEURAL_ELEMENT_TYPES)}, got "
                             f"{element.get('type')!r}")
        section = [dict(item) for item in items[first:first + len(names)]]
        if element["type"] == "SectionMap":
            element.setdefault("section", section)
            keys = {f"{item['name']}.{p}": section_setting_key(f"{item['name']}.{p}") for item in section for p in item}
        else:  # a ResidualElement replaces one element and takes its settings
            if len(names) != 1:
                raise ValueError(f"{where}: a ResidualElement replaces one element, not {names}")
            element.setdefault("element", {k: v for k, v in section[0].items() if k != "name"})
            keys = {f"{names[0]}.{p}": p for p in ("k1", "k2", "ks", "angle", "voltage", "phase", "length", "tilt",
                                                    "x_offset", "y_offset")}
        element.setdefault("name", names[0])
        space_charge = element.get("space_charge")
        trained = space_charge.get("charge") if isinstance(space_charge, dict) else None
        if charge is not None and trained is not None and not math.isclose(abs(trained), abs(charge), rel_tol=1e-6):
            raise ValueError(f"{where}: the {element['type']} {element['name']} carries the space charge of a "
                             f"{abs(trained):.4g} C bunch, but the scan's bunch has {abs(charge):.4g} C")
        if element.get("weights") is not None:
            element["weights"] = str(Path(element["weights"]).resolve())
        inputs = element.get("inputs", [])
        for setting in setting_names:
            if setting.rpartition(".")[0] in names:
                if element["type"] == "SectionMap" and setting not in inputs:
                    raise ValueError(f"{where}: the scan sets {setting}, but the {element['type']} {element['name']} "
                                     f"does not take it (its inputs: {inputs})")
                routes[setting] = f"{element['name']}.{keys.get(setting, setting.rpartition('.')[2])}"
        if entry.get("correct") is not None:
            element = corrected_entry(element, section, entry["correct"], charge, f"{where}.correct")
        items = items[:first] + [element] + items[first + len(names):]
    return items, routes


def corrected_entry(element: dict, section: list[dict], correct, charge: float | None, where: str) -> dict:
    """The lattice entry of a `models.corrected.CorrectedSection`: the SectionMap `element` corrected every
    `correct["every"]` training steps by the replaced `section` tracked with PIC space charge `correct["space_charge"]`."""
    if not isinstance(correct, dict) or set(correct) != {"every", "space_charge"}:
        raise ValueError(f"{where} must be {{every: <training steps between corrections>, space_charge: {{grid_shape: "
                         f"..., max_step: ..., extent: ..., compensate: ...}}}}, got {correct!r}")
    if element["type"] != "SectionMap":
        raise ValueError(f"{where}: only a SectionMap is corrected, not a {element['type']}")
    if not charge:
        raise ValueError(f"{where}: the scan's bunch charge is 0: there is no space charge to correct with")
    every = correct["every"]
    if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
        raise ValueError(f"{where}.every must be a whole number of training steps >= 1, got {every!r}")
    space_charge = correct["space_charge"]
    if not isinstance(space_charge, dict):
        raise ValueError(f"{where}.space_charge must be a PIC config {{grid_shape, max_step, ...}}, got {space_charge!r}")
    sim.SpaceCharge.from_config(space_charge, f"{where}.space_charge")  # checks it now
    return {"type": "CorrectedSection", "name": element["name"], "surrogate": element, "section": section,
            "space_charge": dict(space_charge), "charge": abs(float(charge)), "every": every}
