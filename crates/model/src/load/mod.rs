//! Loading models the way users have them: diffusers folders and single-file checkpoints (work in progress).
