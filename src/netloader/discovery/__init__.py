"""Where sources come from (a phone book, never a judge: identity, digests and the secret
decide what is accepted). `wave`: a shared directory of seeds and members."""
