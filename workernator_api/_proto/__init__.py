"""Generated from proto/ by scripts/gen_proto.sh (make proto). DO NOT EDIT."""
