"""Camera matrices: the rigid inverse used for rasterisation is the inverse of camera-to-world."""

import torch

from dreamflow.scene.cameras import Cameras, CameraSampler


def test_world_to_camera_is_the_inverse_of_camera_to_world():
    cams = CameraSampler(seed=1).sample(32)
    cams = Cameras(torch.cat([cams.azimuth_deg, torch.tensor([0.0, 45.0])]),
                   torch.cat([cams.elevation_deg, torch.tensor([90.0, -90.0])]),  # straight down and up
                   torch.cat([cams.distance, torch.tensor([1.2, 2.0])]), torch.cat([cams.fovy_deg, torch.tensor([50.0, 40.0])]))
    eye = torch.eye(4).expand(len(cams), 4, 4)
    torch.testing.assert_close(cams.w2c() @ cams.c2w(), eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(cams.w2c(), torch.linalg.inv(cams.c2w()), atol=1e-6, rtol=0)
    # The origin, which every camera looks at, lies straight ahead on the camera's -Z axis.
    origin = cams.w2c() @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(origin[:, :2], torch.zeros(len(cams), 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(-origin[:, 2], cams.distance, atol=1e-5, rtol=0)
