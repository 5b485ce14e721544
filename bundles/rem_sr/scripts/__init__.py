"""Scripts of the `rem_sr` bundle: the REM network, the degradation model, data checks and I/O."""
