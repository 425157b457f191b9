//! Import of Hugging Face `config.json` files into a [`crate::ModelSpec`].
