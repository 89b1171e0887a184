//! Building blocks shared by the UNet and the VAE: ResNet blocks, down/up-samplers, attention blocks (work in progress).
