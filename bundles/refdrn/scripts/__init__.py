"""ReFDRN / ReVoxelMorph bundle scripts: registration backbones, the REM cascade and its losses."""
