"""mislib.geometry: the six (plane, convention) screen mappings and world geometry."""

import numpy as np
import pytest

from mislib.geometry import PLANES, plane_axes, screen_mapping, screen_offset

# (plane, convention) -> (image up, image left, direction of increasing frame index)
EXPECTED = {
    ("axial", "standard"): ("A", "R", "S"),     # seen from the feet; frames inferior -> superior
    ("coronal", "standard"): ("S", "R", "P"),   # seen from the front; frames anterior -> posterior
    ("sagittal", "standard"): ("S", "A", "R"),  # anterior on the left; frames left -> right
    ("axial", "storage"): ("R", "A", "I"),      # LPI array as indexed; frames superior -> inferior
    ("coronal", "storage"): ("R", "S", "P"),    # superior on the image left
    ("sagittal", "storage"): ("A", "S", "L"),   # superior on the image left; frames right -> left
}


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda k: "-".join(k))
def test_screen_mapping_pins_up_left_and_frame_order(key):
    m = screen_mapping(*key)
    assert (m.up, m.left, m.frame) == EXPECTED[key]


@pytest.mark.parametrize("plane", PLANES)
def test_screen_axes_lie_in_the_plane_and_frames_cross_it(plane):
    fixed, _ = plane_axes(plane)
    for convention in ("standard", "storage"):
        right, down, frame = screen_mapping(plane, convention).vectors()
        assert right[fixed] == 0 and down[fixed] == 0 and abs(frame[fixed]) == 1
        assert abs(right @ down) == 0


def test_standard_axial_puts_patient_right_on_image_left():
    # a point 10 mm to the patient's right appears 10 mm toward the image's left
    right, down, _ = screen_offset(np.array([10.0, 0.0, 0.0]), screen_mapping("axial", "standard"))
    assert right == -10.0 and down == 0.0


def test_storage_coronal_puts_superior_on_image_left():
    right, down, _ = screen_offset(np.array([0.0, 0.0, 25.0]), screen_mapping("coronal", "storage"))
    assert right == -25.0 and down == 0.0


def test_unknown_plane_or_convention_is_rejected():
    with pytest.raises(ValueError, match="unknown plane"):
        screen_mapping("oblique", "standard")
    with pytest.raises(ValueError, match="unknown convention"):
        screen_mapping("axial", "neurological")
