"""Stage 1, reading: run folders into tables (runs, epochs, hardware, diagnostics, dynamics), which runs
belong together, which way each metric is better, and the number formats every table shares."""
