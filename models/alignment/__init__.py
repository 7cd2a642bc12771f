"""Face crops: the ArcFace template, fixed and landmark crops, FFHQ alignment, YuNet landmarks."""
