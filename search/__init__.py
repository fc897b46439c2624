"""evoprune.search"""
