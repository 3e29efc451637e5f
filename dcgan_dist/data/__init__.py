"""Images on their way to a batch: datasets read into memory, the prepared store on disk (decoding, the format and
reading, preparing and staging), tables of encoded images, the data facts a run needs, and the per-rank batch sources
training draws from. Imports only the top-level base (`errors`, `registry`, `fileio`, `launcher`, `config`)."""
