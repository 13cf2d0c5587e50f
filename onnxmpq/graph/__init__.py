"""The graph: loading and checking a model (`model`), one index of its producers, consumers and
constants (`index`), constant folding (`folding`), file integrity checks (`integrity`), onnxruntime
sessions and the kernel census (`runtime`), the segment-by-segment float pass (`engine`), the
quantization points of a float model (`points`) and the reader of a QDQ model's precisions (`qdq`).

Nothing is imported here, so `ops` (which reads `graph.index`) and `graph.model` (which reads `ops`)
load in either order.
"""
