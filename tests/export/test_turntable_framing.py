"""The turntable shows the whole asset: its camera backs off when the asset's bounding sphere would not fit."""

import math

import numpy as np

from dreamflow.export.mesh import MeshData
from dreamflow.pipeline.job import TURNTABLE_FOVY, turntable_distance


def _box(half: float) -> MeshData:
    corners = np.array([[x, y, z] for x in (-half, half) for y in (-half, half) for z in (-half, half)], np.float32)
    faces = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]], np.int32)
    return MeshData(vertices=corners, faces=faces)


def test_an_asset_inside_the_unit_box_keeps_the_usual_distance():
    assert turntable_distance(_box(0.2)) == 1.3


def test_a_larger_asset_is_framed_whole():
    for half in (0.55, 1.0, 3.0):
        d = turntable_distance(_box(half))
        radius = half * math.sqrt(3.0)
        # The bounding sphere's angular radius stays inside the half field of view, with a margin.
        assert d > 1.3 and math.asin(radius / d) < math.radians(TURNTABLE_FOVY / 2.0)
        assert math.asin(radius / d) > 0.8 * math.radians(TURNTABLE_FOVY / 2.0)  # and not needlessly small
