"""What goes to disk and survives a crash: writes that are whole or refused (:mod:`.files`), weight
files read without running code (:mod:`.weights_file`), one run per directory (:mod:`.run_lock`), and
the checkpoints of a run directory: read, verified and walked back past damage (:mod:`.checkpoint`),
written atomically with a checksum (:mod:`.checkpoint_write`), numbered and rotated
(:mod:`.checkpoint_store`)."""
