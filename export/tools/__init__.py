"""Work on export directories beyond exporting: int8 quantization, accuracy per engine x
precision, the benchmark, and loading real inputs (tensor files, image folders)."""
