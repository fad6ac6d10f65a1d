"""Which structures each source asks about, what a reader calls them, and their tissue class.

Three small tables, one concept each:

- **Curated structure lists** (:data:`CURATED`, :func:`curated`): per kind of source, the
  structures a radiologist names and a reader can find on a slice. The brain atlas keeps its
  compact deep-grey and ventricular structures (not the hemispheric white matter or the
  cortical gyri, which cover most of the image and have no single centre); a torso scan keeps
  its organs, named vessels, vertebrae and large bones (not the 24 ribs, the costal cartilages
  or deep back muscles). A profile names a list per source in ``[volumes.structure_lists]``;
  stage 01 drops every other label before measuring, so components, slices, renders and
  questions all see the same set.
- **Readable names** (:func:`readable_name`): the one name map every question uses, from the
  raw label names of the atlases and TotalSegmentator (``Left_MTG_middle_temporal_gyrus`` ->
  "left middle temporal gyrus", ``kidney_left`` -> "left kidney", ``vertebrae_L1`` ->
  "L1 vertebra").
- **Tissue classes** (:func:`tissue_class`): ``air`` (lungs, airways), ``bone`` or
  ``soft_tissue``, which choose the CT display window of a slice in stage 02.

See ``docs/design.md`` (sources and structures).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# ---- curated lists -----------------------------------------------------------------------

_SIDES = ("left", "right")


def _both(*names: str) -> tuple[str, ...]:
    """``kidney_{side}`` -> (kidney_left, kidney_right); ``{Side}_Putamen`` likewise."""
    out = []
    for name in names:
        for side in _SIDES:
            out.append(name.format(side=side, Side=side.capitalize()))
    return tuple(out)


#: Neuromorphometrics atlas (MNI152) names: deep grey nuclei, ventricles, hippocampus,
#: amygdala, brain stem, cerebellum.
BRAIN = (
    *_both("{Side}_Thalamus_Proper", "{Side}_Caudate", "{Side}_Putamen", "{Side}_Pallidum",
           "{Side}_Hippocampus", "{Side}_Amygdala", "{Side}_Lateral_Ventricle",
           "{Side}_Cerebellum_Exterior"),
    "3rd_Ventricle", "4th_Ventricle", "Brain_Stem",
)

_VERTEBRAE = tuple(f"vertebrae_{v}" for v in (
    *(f"C{i}" for i in range(1, 8)), *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)), "S1"))

#: TotalSegmentator ``total`` (CT) class names: organs, named vessels, vertebrae, large bones.
TORSO_CT = (
    "liver", "spleen", *_both("kidney_{side}"), "gallbladder", "stomach", "pancreas",
    *_both("adrenal_gland_{side}"), "esophagus", "trachea", "thyroid_gland", "duodenum",
    "small_bowel", "colon", "urinary_bladder", "prostate", "heart",
    "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
    "lung_middle_lobe_right", "lung_lower_lobe_right",
    "aorta", "inferior_vena_cava", "superior_vena_cava", "portal_vein_and_splenic_vein",
    "pulmonary_vein", "brachiocephalic_trunk", *_both("brachiocephalic_vein_{side}"),
    *_both("common_carotid_artery_{side}", "subclavian_artery_{side}", "iliac_artery_{side}",
           "iliac_vena_{side}"),
    *_VERTEBRAE, "sacrum", "sternum", "spinal_cord",
    *_both("hip_{side}", "femur_{side}", "humerus_{side}", "scapula_{side}",
           "clavicula_{side}", "iliopsoas_{side}", "gluteus_maximus_{side}"),
)

#: TotalSegmentator ``total_mr`` class names, by the same rule (its spine is one label for all
#: vertebrae and one for all discs, neither a structure with one place, so both are left out).
TORSO_MR = (
    "liver", "spleen", *_both("kidney_{side}"), "gallbladder", "stomach", "pancreas",
    *_both("adrenal_gland_{side}"), *_both("lung_{side}"), "esophagus", "duodenum",
    "small_bowel", "colon", "urinary_bladder", "prostate", "heart", "aorta",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "sacrum", "spinal_cord",
    *_both("iliac_artery_{side}", "iliac_vena_{side}", "hip_{side}", "femur_{side}",
           "humerus_{side}", "scapula_{side}", "clavicula_{side}", "iliopsoas_{side}",
           "gluteus_maximus_{side}"),
)

#: The knee phantom's (and a knee MRI label table's) structures: all of them.
KNEE = ("femur", "tibia", "patella", "fibula", "femoral_cartilage", "tibial_cartilage",
        "patellar_cartilage", "medial_meniscus", "lateral_meniscus")

CURATED: dict[str, tuple[str, ...]] = {"brain": BRAIN, "torso_ct": TORSO_CT,
                                       "torso_mr": TORSO_MR, "knee": KNEE}


def curated(name: str) -> tuple[str, ...]:
    """The curated structure list ``name`` (a key of :data:`CURATED`).

    >>> "Left_Hippocampus" in curated("brain")
    True
    """
    try:
        return CURATED[name]
    except KeyError:
        raise ValueError(f"unknown structure list {name!r}; known: {sorted(CURATED)}") from None


def structures_for(source: str, lists: dict | None) -> tuple[str, ...]:
    """The structures a source keeps, from a profile's ``[volumes.structure_lists]`` table.

    A value is the name of a curated list or an explicit list of label names; a source that
    is not in the table keeps every structure (empty tuple).
    """
    spec = (lists or {}).get(source)
    if spec is None or spec == "" or spec == []:
        return ()
    if isinstance(spec, str):
        return curated(spec)
    if isinstance(spec, Sequence) and all(isinstance(s, str) for s in spec):
        return tuple(spec)
    raise ValueError(f"[volumes.structure_lists] {source}: expected a list name or a list of "
                     f"structure names, got {spec!r}")


# ---- readable names ------------------------------------------------------------------------

#: Whole-name spellings the word rules below cannot produce (without the side word; a
#: ``{side}`` in the spelling places the side there instead of in front).
_NAMES = {
    "Thalamus_Proper": "thalamus",
    "Cerebellum_Exterior": "cerebellar cortex",
    "Cerebellum_White_Matter": "cerebellar white matter",
    "Cerebral_White_Matter": "cerebral white matter",
    "Inf_Lat_Vent": "inferior horn of the lateral ventricle",
    "Ventral_DC": "ventral diencephalon",
    "Accumbens_Area": "nucleus accumbens",
    "3rd_Ventricle": "third ventricle",
    "4th_Ventricle": "fourth ventricle",
    "CSF": "cerebrospinal fluid",
    "vessel": "vessel",
    "portal_vein_and_splenic_vein": "portal and splenic veins",
    "iliac_artery": "common iliac artery",
    "iliac_vena": "common iliac vein",
    "clavicula": "clavicle",
    "hip": "hip bone",
    "autochthon": "erector spinae muscles",
    "iliopsoas": "iliopsoas muscle",
    "pulmonary_vein": "pulmonary veins",
    "costal_cartilages": "costal cartilages",
    "small_bowel": "small bowel",
    "lung_upper_lobe": "upper lobe of the {side} lung",
    "lung_middle_lobe": "middle lobe of the {side} lung",
    "lung_lower_lobe": "lower lobe of the {side} lung",
    "kidney_cyst": "kidney cyst",
    "atrial_appendage": "atrial appendage",
}

_ORDINAL = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth",
            7: "seventh", 8: "eighth", 9: "ninth", 10: "tenth", 11: "eleventh", 12: "twelfth"}
#: ``Left_MTG_middle_temporal_gyrus``, ``Left_Calc_calcarine_cortex``: a capitalised
#: abbreviation followed by its spelled-out words in lower case.
_ABBREVIATED = re.compile(r"^[A-Z][A-Za-z]*_([a-z][a-z_]*)$")


def readable_name(component: str) -> str:
    """The name a reader would use for a raw label name.

    The side (``left``/``right``, wherever it stands) comes first; an atlas abbreviation
    followed by its spelled-out words keeps only the words; vertebrae and ribs read as a
    radiologist says them; known awkward names are spelled out (``clavicula`` -> clavicle,
    ``iliac_vena`` -> common iliac vein); the rest is lower-cased with spaces.

    >>> readable_name("Left_MTG_middle_temporal_gyrus")
    'left middle temporal gyrus'
    >>> readable_name("kidney_left"), readable_name("vertebrae_L1"), readable_name("rib_right_5")
    ('left kidney', 'L1 vertebra', 'right fifth rib')
    """
    raw = str(component).strip()
    words = [w for w in raw.split("_") if w]
    side = next((w.lower() for w in words if w.lower() in _SIDES), None)
    rest = [w for w in words if w.lower() not in _SIDES]
    core = "_".join(rest)
    if (m := re.fullmatch(r"vertebrae_([CTLS]\d{1,2})", core)):
        name = f"{m.group(1)} vertebra"
    elif (m := re.fullmatch(r"rib_(\d{1,2})", core)) and int(m.group(1)) in _ORDINAL:
        name = f"{_ORDINAL[int(m.group(1))]} rib"
    elif core in _NAMES:
        name = _NAMES[core]
        if "{side}" in name:
            return " ".join(name.format(side=side or "").split())
    elif (m := _ABBREVIATED.match(core)):
        name = m.group(1).replace("_", " ")
    else:
        name = " ".join(w if _keep_case(w) else w.lower() for w in rest)
    return f"{side} {name}" if side else name


def _keep_case(word: str) -> bool:
    """Tokens such as ``L1``, ``CSF`` or ``I-V`` keep their capitals."""
    return any(c.isdigit() for c in word) or sum(c.isupper() for c in word) > 1


# ---- tissue classes ---------------------------------------------------------------------

TISSUE_CLASSES = ("soft_tissue", "air", "bone")
_AIR = re.compile(r"^(lung|trachea|bronch)", re.IGNORECASE)
_BONE = re.compile(r"^(vertebra|rib_|sternum|costal_cartilage|hip_|sacrum|femur|humerus|"
                   r"scapula|clavicula|skull|tibia|fibula|patella)", re.IGNORECASE)


def tissue_class(component: str) -> str:
    """``air`` (lungs and airways), ``bone`` (bones and cartilage of the skeleton) or
    ``soft_tissue`` (everything else: organs, vessels, muscles, brain) for a label name.

    Cartilage of a joint (``femoral_cartilage``) is soft tissue; ``patellar_cartilage`` too.
    """
    name = str(component)
    if "cartilage" in name.lower() and not name.lower().startswith("costal"):
        return "soft_tissue"
    if _AIR.match(name):
        return "air"
    if _BONE.match(name):
        return "bone"
    return "soft_tissue"


def common_tissue_class(components: Iterable[str]) -> str:
    """The tissue class shared by every structure, or ``soft_tissue`` when they mix (or when
    there are none): a lung window for lung lobes alone, never for lungs beside the liver."""
    classes = {tissue_class(c) for c in components}
    return classes.pop() if len(classes) == 1 else "soft_tissue"


# ---- textbook facts ------------------------------------------------------------------------

#: (a, direction, b): structure ``a`` lies in the patient direction (R, L, A, P, S, I) from
#: ``b``, as every anatomy text states it; notebook 01 checks those a volume has.
TEXTBOOK_FACTS: tuple[tuple[str, str, str], ...] = (
    ("liver", "R", "spleen"),
    ("inferior_vena_cava", "R", "aorta"),
    ("gallbladder", "R", "stomach"),
    ("liver", "S", "kidney_right"),
    ("liver", "S", "urinary_bladder"),
    ("heart", "S", "liver"),
    ("aorta", "A", "spinal_cord"),
    ("gallbladder", "A", "kidney_right"),
    ("vertebrae_T11", "S", "vertebrae_T12"),
    ("vertebrae_T12", "S", "vertebrae_L1"),
    ("vertebrae_L1", "S", "vertebrae_L2"),
    ("vertebrae_L1", "S", "vertebrae_L5"),
    ("brachiocephalic_trunk", "R", "common_carotid_artery_left"),
    ("common_carotid_artery_left", "R", "subclavian_artery_left"),
    ("Left_Thalamus_Proper", "S", "Brain_Stem"),
    ("Left_Thalamus_Proper", "A", "Left_Cerebellum_Exterior"),
    ("Left_Putamen", "L", "Left_Thalamus_Proper"),
    ("patella", "A", "femur"),
)
