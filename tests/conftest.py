import pathlib
import sys

# tests import their helpers module directly
sys.path.insert(0, str(pathlib.Path(__file__).parent))
