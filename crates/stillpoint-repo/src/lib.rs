//! stillpoint's backup repository: chunks, indexes, manifests, crypto, backends, verify, prune, gc.
//!
//! (Design note to be written with the crate's first real code.)
