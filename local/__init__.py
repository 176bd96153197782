"""The local stack: everything the system needs, on one machine, with no AWS account."""
