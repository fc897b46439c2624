"""evoprune.storage"""
