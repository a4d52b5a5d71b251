"""Decoding: on-device sampling (`sampling`), the generation loop (`generate`) and CUDA-graph decode steps
(`graphs`)."""
