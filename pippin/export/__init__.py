"""Export pippin models to other runtimes: GGUF (llama.cpp, Ollama) and Core ML (an mlprogram with palettized weights).

`tensors` reads a loaded model, full precision or compressed, as one dense weight per Hugging Face name with its
compression record (bits, LUTs, indices); `gguf` and `coreml` write the files and measure what they kept. Export reads
pippin.model and pippin.quant; nothing in pippin below the commands imports it.
"""
