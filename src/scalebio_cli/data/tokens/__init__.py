"""Records to tokens: rendering with the chat template (render), encoding on every core (encode_chunks), the
on-disk token cache (token_cache), whole sources (tokenized) and sources tokenized as drawn (lazy_tokens)."""
