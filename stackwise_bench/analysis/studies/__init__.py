"""Stage 3, the studies: one module per kind of study (precision, optimizer, PEFT, quantization, regimes,
scaling, search, energy, expectations), each with its view and its report section."""
