"""ShapesWorld: a procedural teacher and a GenEval-style scorer that need no neural weights."""
