//! The VAE, AutoencoderKL (work in progress).
