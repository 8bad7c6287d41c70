"""Text in and out of token ids: tokenizers (SentencePiece, tiktoken, Hugging Face), dialog formats and chat
templates, and what the command line reads from the user."""
