"""Everything that touches the disk: reading checkpoints, atomic streamed saves, the user's
model folders (and the names that may be resolved inside them), the app's data folder, and the
in-RAM model cache keyed by file."""
