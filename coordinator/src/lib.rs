//! moeshard coordinator
