"""The shapes world: synthetic images with captions, questions, boxes and statements that are
true of them, made to stand in for COCO, VQA, RefCOCO, NLVR2 and SNLI-VE in tests, learning checks
and the demo (`mplug synth`). Apart from ingest: nothing in the production path imports it.

- `world`: scenes of shapes, their captions, and corpora written in every ingest input format;
- `tasks`: each finetuning task's annotation files over the shapes world, and their baselines;
- `language`: the words and templates captions, questions and expressions are made of.
"""
