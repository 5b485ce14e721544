"""Scripts of the `f3rnet_ct_mri` bundle: the F3RNet registration network and its MIND-SSC + smoothness losses."""
