"""Images on their way to a batch: the built-in sets read into memory, the prepared store on disk (decoding, the
format and reading, preparing, the one writer, staging), tables of encoded images, the data facts a run needs,
and the per-rank batch sources training draws from. Imports only the top-level base (`errors`, `registry`,
`fileio`, `launcher`); never `config` or `train`: config sections arrive as plain objects."""
