//! Platform trait and drivers (qemu now; libvirt, kubevirt later): agent access, capture, capture reading.
//!
//! (Design note to be written with the crate's first real code.)
